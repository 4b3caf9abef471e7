"""Baseline: the schema the server created with create_all before migrations existed.

Metadata store (metadata, current), fleet registry (devices, device_certs,
enrollment_tokens), check-ins (checkin_nonces, checkins, attestation_keys,
device_alerts). A database made by an older server (tables, no ``alembic_version``) is
adopted at this revision (see :func:`otaguard.server.storage.migrate.upgrade_database`).

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metadata",
        sa.Column("filename", sa.String(255), primary_key=True),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_metadata_role_version", "metadata", ["role", "version"])
    op.create_table(
        "current",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("filename", sa.String(255), sa.ForeignKey("metadata.filename"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("hardware_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "device_certs",
        sa.Column("cert_serial", sa.String(64), primary_key=True),
        sa.Column("serial", sa.String(64), sa.ForeignKey("devices.serial"), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_device_certs_serial", "device_certs", ["serial"])
    op.create_table(
        "enrollment_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("serial", sa.String(64), sa.ForeignKey("devices.serial"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "checkin_nonces",
        sa.Column("nonce", sa.String(128), primary_key=True),
        sa.Column("serial", sa.String(64), sa.ForeignKey("devices.serial"), nullable=False),
        sa.Column("cert_serial", sa.String(64), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_checkin_nonces_expires", "checkin_nonces", ["expires_at"])
    op.create_index("ix_checkin_nonces_cert", "checkin_nonces", ["cert_serial"])
    op.create_table(
        "checkins",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("serial", sa.String(64), sa.ForeignKey("devices.serial"), nullable=False),
        sa.Column("cert_serial", sa.String(64), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_time", sa.String(64), nullable=False),
        sa.Column("running_version", sa.String(256), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("boot_sha256", sa.String(64), nullable=False),
        sa.Column("attested", sa.Boolean, nullable=False),
        sa.Column("reset_count", sa.BigInteger, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.String(1000), nullable=False),
        sa.Column("manifest", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_checkins_serial_time", "checkins", ["serial", "time"])
    op.create_index("ix_checkins_cert_time", "checkins", ["cert_serial", "time"])
    op.create_table(
        "attestation_keys",
        sa.Column("serial", sa.String(64), sa.ForeignKey("devices.serial"), primary_key=True),
        sa.Column("public_pem", sa.String(1024), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "device_alerts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("serial", sa.String(64), sa.ForeignKey("devices.serial"), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(1000), nullable=False),
    )
    op.create_index("ix_device_alerts_serial_time", "device_alerts", ["serial", "time"])


def downgrade() -> None:
    for table in (
        "device_alerts",
        "attestation_keys",
        "checkins",
        "checkin_nonces",
        "enrollment_tokens",
        "device_certs",
        "devices",
        "current",
        "metadata",
    ):
        op.drop_table(table)
