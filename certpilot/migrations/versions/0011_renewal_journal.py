"""renewal journal: the pending key, CA order and issuer of a renewal in progress, and since when

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 11:30:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel

from certpilot.models import UTCDateTime


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('managed_certificate', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pending_key_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('pending_order_url', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('pending_issuer', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
        batch_op.add_column(sa.Column('pending_since', UTCDateTime(), nullable=True))
        batch_op.create_foreign_key('fk_managed_certificate_pending_key_id', 'private_key', ['pending_key_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('managed_certificate', schema=None) as batch_op:
        batch_op.drop_constraint('fk_managed_certificate_pending_key_id', type_='foreignkey')
        batch_op.drop_column('pending_since')
        batch_op.drop_column('pending_issuer')
        batch_op.drop_column('pending_order_url')
        batch_op.drop_column('pending_key_id')
