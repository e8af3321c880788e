"""revocation campaigns: revoke-and-replace runs and their items (resumable, item by item)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 10:00:00.000000
"""
from alembic import op
import sqlalchemy as sa

from certpilot.models import UTCDateTime


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'replacement_run',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('scope_key', sa.String(length=64), nullable=False),
        sa.Column('scope', sa.JSON(), nullable=False),
        sa.Column('reason', sa.String(length=32), nullable=False),
        sa.Column('revoke_first', sa.Boolean(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('flow_run_id', sa.String(length=64), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.Column('finished_at', UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_replacement_run_scope_key', 'replacement_run', ['scope_key'])
    op.create_table(
        'replacement_item',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('old_fingerprint', sa.String(length=64), nullable=False),
        sa.Column('managed', sa.String(), nullable=True),
        sa.Column('action', sa.String(length=16), nullable=False),
        sa.Column('why', sa.String(), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('key_id', sa.String(length=32), nullable=True),
        sa.Column('order_url', sa.String(), nullable=True),
        sa.Column('new_fingerprint', sa.String(length=64), nullable=True),
        sa.Column('revoked_at', UTCDateTime(), nullable=True),
        sa.Column('error', sa.String(), nullable=True),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['replacement_run.id']),
        sa.ForeignKeyConstraint(['old_fingerprint'], ['certificate.fingerprint_sha256']),
        sa.ForeignKeyConstraint(['key_id'], ['private_key.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_id', 'old_fingerprint', name='uq_replacement_item_run_old'),
    )
    op.create_index('ix_replacement_item_run_id', 'replacement_item', ['run_id'])


def downgrade() -> None:
    op.drop_index('ix_replacement_item_run_id', table_name='replacement_item')
    op.drop_table('replacement_item')
    op.drop_index('ix_replacement_run_scope_key', table_name='replacement_run')
    op.drop_table('replacement_run')
