"""discovery and deployment: what each location showed, and which certificate each target should serve

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 12:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('location', schema=None) as batch_op:
        batch_op.add_column(sa.Column('details', sa.JSON(), nullable=True))
        batch_op.create_index('ix_location_source_ghost', ['source', 'ghost'], unique=False)
    with op.batch_alter_table('target', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_error', sa.String(), nullable=True))
        batch_op.add_column(sa.Column('deployed_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('target', schema=None) as batch_op:
        batch_op.drop_column('deployed_at')
        batch_op.drop_column('last_error')
    with op.batch_alter_table('location', schema=None) as batch_op:
        batch_op.drop_index('ix_location_source_ghost')
        batch_op.drop_column('details')
