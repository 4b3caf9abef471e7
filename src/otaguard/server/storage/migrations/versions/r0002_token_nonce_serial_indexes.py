"""Index enrollment tokens and check-in nonces by device serial.

A new token (or a revocation) retires the device's open tokens with ``UPDATE ... WHERE
serial = ? AND used_at IS NULL``; without an index that scans every token of the fleet
while holding row locks, which several server processes on one PostgreSQL contend for.
The nonces' serial is the foreign key to devices; indexing it keeps a device's removal
and per-device queries from scanning the table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_enrollment_tokens_serial", "enrollment_tokens", ["serial"])
    op.create_index("ix_checkin_nonces_serial", "checkin_nonces", ["serial"])


def downgrade() -> None:
    op.drop_index("ix_checkin_nonces_serial", table_name="checkin_nonces")
    op.drop_index("ix_enrollment_tokens_serial", table_name="enrollment_tokens")
