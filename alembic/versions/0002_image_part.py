"""images.part: which physical part a photo shows, so a part's images never straddle a split

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('images', sa.Column('part', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('images') as batch:  # SQLite drops a column by copying the table
        batch.drop_column('part')
