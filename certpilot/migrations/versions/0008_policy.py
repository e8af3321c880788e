"""policy: violations per certificate (and per place), waivers; URI names on managed certificates

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 05:00:00.000000
"""
from alembic import op
import sqlalchemy as sa

from certpilot.models import UTCDateTime


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('managed_certificate') as batch:
        batch.add_column(sa.Column('uris', sa.JSON(), nullable=False, server_default='[]'))
    op.create_table(
        'policy_waiver',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('rule', sa.String(length=32), nullable=False),
        sa.Column('scope', sa.String(), nullable=False),
        sa.Column('reason', sa.String(), nullable=False),
        sa.Column('approver', sa.String(), nullable=False),
        sa.Column('expires_at', UTCDateTime(), nullable=False),
        sa.Column('created_by', sa.String(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('revoked_at', UTCDateTime(), nullable=True),
        sa.Column('revoked_by', sa.String(), nullable=True),
        sa.Column('expiry_noted_at', UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_policy_waiver_expires_at', 'policy_waiver', ['expires_at'])
    op.create_table(
        'policy_violation',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('certificate_fingerprint', sa.String(length=64), nullable=False),
        sa.Column('place', sa.String(), nullable=False),
        sa.Column('rule', sa.String(length=32), nullable=False),
        sa.Column('severity', sa.String(length=16), nullable=False),
        sa.Column('detail', sa.String(), nullable=False),
        sa.Column('waiver_id', sa.Integer(), nullable=True),
        sa.Column('first_seen', UTCDateTime(), nullable=False),
        sa.Column('last_seen', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['certificate_fingerprint'], ['certificate.fingerprint_sha256']),
        sa.ForeignKeyConstraint(['waiver_id'], ['policy_waiver.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('certificate_fingerprint', 'place', 'rule', name='uq_policy_violation'),
    )
    op.create_index('ix_policy_violation_certificate_fingerprint', 'policy_violation', ['certificate_fingerprint'])
    op.create_index('ix_policy_violation_rule', 'policy_violation', ['rule'])


def downgrade() -> None:
    op.drop_index('ix_policy_violation_rule', table_name='policy_violation')
    op.drop_index('ix_policy_violation_certificate_fingerprint', table_name='policy_violation')
    op.drop_table('policy_violation')
    op.drop_index('ix_policy_waiver_expires_at', table_name='policy_waiver')
    op.drop_table('policy_waiver')
    with op.batch_alter_table('managed_certificate') as batch:
        batch.drop_column('uris')
