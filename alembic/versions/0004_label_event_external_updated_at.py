"""label_events.external_updated_at: when the annotator's tool last saved the answer an event records, so an answer
saved again unchanged (an annotator confirming a label the loop asked about) is seen as an answer

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""
import sqlalchemy as sa

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('label_events', sa.Column('external_updated_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('label_events') as batch:  # SQLite drops a column by copying the table
        batch.drop_column('external_updated_at')
