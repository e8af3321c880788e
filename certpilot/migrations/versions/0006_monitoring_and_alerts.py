"""monitoring and alerts: source runs, endpoint checks, alerts and their deliveries, suppressions, the alert policy

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 20:20:00.000000
"""
from alembic import op
import sqlalchemy as sa

from certpilot.models import UTCDateTime


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'source_run',
        sa.Column('source', sa.String(), nullable=False),
        sa.Column('block', sa.String(), nullable=True),
        sa.Column('last_started_at', UTCDateTime(), nullable=True),
        sa.Column('last_completed_at', UTCDateTime(), nullable=True),
        sa.Column('last_failed_at', UTCDateTime(), nullable=True),
        sa.Column('last_error', sa.String(), nullable=True),
        sa.Column('flow_run_id', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('source'),
    )
    op.create_table(
        'endpoint_check',
        sa.Column('place', sa.String(), nullable=False),
        sa.Column('checked_at', UTCDateTime(), nullable=False),
        sa.Column('served_fingerprint', sa.String(length=64), nullable=True),
        sa.Column('expected_fingerprint', sa.String(length=64), nullable=True),
        sa.Column('ok', sa.Boolean(), nullable=False),
        sa.Column('problems', sa.JSON(), nullable=False),
        sa.Column('tls_version', sa.String(length=16), nullable=True),
        sa.Column('revocation', sa.String(length=16), nullable=True),
        sa.Column('error', sa.String(), nullable=True),
        sa.Column('flow_run_id', sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint('place'),
    )
    op.create_index('ix_endpoint_check_checked_at', 'endpoint_check', ['checked_at'])
    op.create_table(
        'suppression',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('scope', sa.String(), nullable=False),
        sa.Column('starts_at', UTCDateTime(), nullable=False),
        sa.Column('ends_at', UTCDateTime(), nullable=False),
        sa.Column('reason', sa.String(), nullable=False),
        sa.Column('created_by', sa.String(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('ended_at', UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_suppression_ends_at', 'suppression', ['ends_at'])
    op.create_table(
        'alert',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('object', sa.String(), nullable=False),
        sa.Column('condition', sa.String(length=48), nullable=False),
        sa.Column('severity', sa.String(length=16), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('summary', sa.String(), nullable=False),
        sa.Column('owner', sa.String(), nullable=True),
        sa.Column('tags', sa.JSON(), nullable=False),
        sa.Column('details', sa.JSON(), nullable=False),
        sa.Column('first_seen', UTCDateTime(), nullable=False),
        sa.Column('last_seen', UTCDateTime(), nullable=False),
        sa.Column('resolved_at', UTCDateTime(), nullable=True),
        sa.Column('notified_severity', sa.String(length=16), nullable=True),
        sa.Column('notifications_sent', sa.Integer(), nullable=False),
        sa.Column('last_notified_at', UTCDateTime(), nullable=True),
        sa.Column('acknowledged_by', sa.String(), nullable=True),
        sa.Column('acknowledged_at', UTCDateTime(), nullable=True),
        sa.Column('suppression_id', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['suppression_id'], ['suppression.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_alert_object', 'alert', ['object'])
    op.create_index('ix_alert_owner', 'alert', ['owner'])
    op.create_index('ix_alert_state_severity', 'alert', ['state', 'severity'])
    op.create_index('uq_alert_unresolved', 'alert', ['object', 'condition'], unique=True,
                    sqlite_where=sa.text("state != 'resolved'"), postgresql_where=sa.text("state != 'resolved'"))
    op.create_table(
        'alert_delivery',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('alert_id', sa.Integer(), nullable=True),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('channel', sa.String(), nullable=False),
        sa.Column('owner', sa.String(), nullable=True),
        sa.Column('at', UTCDateTime(), nullable=False),
        sa.Column('ok', sa.Boolean(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('error', sa.String(), nullable=True),
        sa.ForeignKeyConstraint(['alert_id'], ['alert.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_alert_delivery_alert_id', 'alert_delivery', ['alert_id'])
    op.create_index('ix_alert_delivery_at', 'alert_delivery', ['at'])
    op.create_table(
        'alert_policy',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('loaded_by', sa.String(), nullable=False),
        sa.Column('loaded_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('alert_policy')
    op.drop_index('ix_alert_delivery_at', table_name='alert_delivery')
    op.drop_index('ix_alert_delivery_alert_id', table_name='alert_delivery')
    op.drop_table('alert_delivery')
    op.drop_index('uq_alert_unresolved', table_name='alert')
    op.drop_index('ix_alert_state_severity', table_name='alert')
    op.drop_index('ix_alert_owner', table_name='alert')
    op.drop_index('ix_alert_object', table_name='alert')
    op.drop_table('alert')
    op.drop_index('ix_suppression_ends_at', table_name='suppression')
    op.drop_table('suppression')
    op.drop_index('ix_endpoint_check_checked_at', table_name='endpoint_check')
    op.drop_table('endpoint_check')
    op.drop_table('source_run')
