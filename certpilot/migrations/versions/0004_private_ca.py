"""private CA: the current CRL on the CA row

Revision ID: 0004
Revises: 0003 (0003_certificate_status_not_after_index took 0003 first; chained after it to keep one head)
Create Date: 2026-11-23 09:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('certificate_authority', schema=None) as batch_op:
        batch_op.add_column(sa.Column('crl_der', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('certificate_authority', schema=None) as batch_op:
        batch_op.drop_column('crl_der')
