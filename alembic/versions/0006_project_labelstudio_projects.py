"""projects.labelstudio_projects: each Label Studio project the store pushed tasks to, with the time Label Studio says
it was created, so a project id that now names another project (a server reinstalled or replaced, whose ids started
over) is told apart from the store's own

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""
import sqlalchemy as sa

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('projects', sa.Column('labelstudio_projects', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('projects') as batch:  # SQLite drops a column by copying the table
        batch.drop_column('labelstudio_projects')
