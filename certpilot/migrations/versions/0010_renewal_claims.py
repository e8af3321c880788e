"""renewal claims: the run renewing a managed certificate, until when

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 11:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel

from certpilot.models import UTCDateTime


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'renewal_claim',
        sa.Column('managed_certificate_id', sa.Integer(), nullable=False),
        sa.Column('holder', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column('until', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['managed_certificate_id'], ['managed_certificate.id']),
        sa.PrimaryKeyConstraint('managed_certificate_id'),
    )


def downgrade() -> None:
    op.drop_table('renewal_claim')
