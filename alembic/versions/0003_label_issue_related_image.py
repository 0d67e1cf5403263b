"""label_issues.related_image_id: the image a finding points at (a near-duplicate's copy, an outlier's nearest image)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
import sqlalchemy as sa

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('label_issues') as batch:  # SQLite adds a foreign key by copying the table
        batch.add_column(sa.Column('related_image_id', sa.Integer(), nullable=True))
        batch.create_foreign_key('fk_label_issues_related_image_id_images', 'images', ['related_image_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('label_issues') as batch:
        batch.drop_constraint('fk_label_issues_related_image_id_images', type_='foreignkey')
        batch.drop_column('related_image_id')
