"""images.split_drawn: the image's split is the ingest's own random draw (labeled at ingest, no part), so a round may
put it beside its near-copies before anything measured it; NULL for images placed otherwise or ingested before

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""
import sqlalchemy as sa

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('images', sa.Column('split_drawn', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('images') as batch:  # SQLite drops a column by copying the table
        batch.drop_column('split_drawn')
