"""Index check-in nonces by the time they were spent.

Since an accepted check-in hands out the nonce for the next one (ADR 0036), a nonce may
be valid for a day; a spent one is kept only briefly (to name a replay as one) and then
purged by ``used_at``, which every server process does every few seconds: indexed, the
purge does not scan the table (about one row per device).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_checkin_nonces_used", "checkin_nonces", ["used_at"])


def downgrade() -> None:
    op.drop_index("ix_checkin_nonces_used", table_name="checkin_nonces")
