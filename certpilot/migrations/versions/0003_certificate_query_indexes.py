"""certificate: index (status, not_after) for the expiry queries, and a partial index of CA subjects

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 09:10:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import certpilot.models


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('certificate', schema=None) as batch_op:
        batch_op.create_index('ix_certificate_status_not_after', ['status', 'not_after'], unique=False)
        batch_op.create_index('ix_certificate_ca_subject', ['subject'], unique=False,
                              sqlite_where=sa.text('is_ca IS 1'), postgresql_where=sa.text('is_ca IS true'))


def downgrade() -> None:
    with op.batch_alter_table('certificate', schema=None) as batch_op:
        batch_op.drop_index('ix_certificate_ca_subject')
        batch_op.drop_index('ix_certificate_status_not_after')
