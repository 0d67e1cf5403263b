"""projects.class_renames: each class renamed by `loop rename-class` (old name -> new name), so an answer an annotator
gives later under the old name (a draft saved before the rename, an editor left open) is taken as the new class

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""
import sqlalchemy as sa

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('projects', sa.Column('class_renames', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('projects') as batch:  # SQLite drops a column by copying the table
        batch.drop_column('class_renames')
