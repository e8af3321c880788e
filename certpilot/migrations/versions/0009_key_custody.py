"""key custody: CA keys on PKCS#11 tokens (token_key), an issuing key either in the keystore or on a token

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10 09:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel

from certpilot.models import UTCDateTime


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'token_key',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('module', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('token_label', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('key_label', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column('key_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('algorithm', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('spki_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('made_on_token', sa.Boolean(), nullable=False),
        sa.Column('extractable', sa.Boolean(), nullable=False),
        sa.Column('pin_env', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('pin_file', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('certificate_authority', schema=None) as batch_op:
        batch_op.alter_column('issuing_key_id', existing_type=sqlmodel.sql.sqltypes.AutoString(), nullable=True)
        batch_op.add_column(sa.Column('issuing_token_key_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.create_foreign_key('fk_certificate_authority_issuing_token_key_id', 'token_key',
                                    ['issuing_token_key_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('certificate_authority', schema=None) as batch_op:
        batch_op.drop_constraint('fk_certificate_authority_issuing_token_key_id', type_='foreignkey')
        batch_op.drop_column('issuing_token_key_id')
        batch_op.alter_column('issuing_key_id', existing_type=sqlmodel.sql.sqltypes.AutoString(), nullable=False)
    op.drop_table('token_key')
