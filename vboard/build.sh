#!/bin/bash
# Builds the otaguard virtual board (ADR 0033) under $OUT (default .cache/vboard), as root:
#   base-<key>/      minimal Debian (mmdebstrap from this machine's apt sources), cached
#                    (in $VBOARD_BASE_CACHE if set) until what builds it changes
#   wheels/          otaguard and its agent dependencies as wheels (no server extras)
#   slot-<v>.ext4    a root file system per board version: base + otaguard's agent in a venv
#                    (/opt/otaguard) + the overlay; "fail" versions carry a failing health unit
#   BOOTX64.EFI      grub-mkstandalone; its embedded config chains to the A/B grub.cfg
#   esp.vfat         ESP: BOOTX64.EFI, grub.cfg, grubenv (A_OK=1: the factory slot)
#   disk.img         GPT: esp, rootfs_a (factory version), rootfs_b (empty), data
# The device directory on the data partition is written by provision.sh (it needs the
# server's root metadata and CA), which the test runs against its own server.
# Usage: build.sh OUT VERSION... (the first version goes into slot A)
set -euo pipefail
OUT=${1:?usage: build.sh OUT VERSION...}; shift
VERSIONS=("$@")
[ ${#VERSIONS[@]} -ge 1 ] || { echo "build.sh: no version given" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
[ "$(id -u)" = 0 ] || { echo "build.sh: needs root (chroot, mke2fs -d with owners)" >&2; exit 1; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Fixed partition UUIDs: grub.cfg passes root=PARTUUID=..., the test finds partitions by them.
UUID_A=5a1a0000-0000-4000-8000-00000000000a
UUID_B=5a1a0000-0000-4000-8000-00000000000b
# Sizes in MiB: the slots hold about 420 MiB of file system; the data partition the device
# directory (downloads stream into the slot, not here).
ESP_MB=64; SLOT_MB=768; DATA_MB=128
PACKAGES=systemd-sysv,udev,linux-image-cloud-amd64,python3,python3-venv,e2fsprogs,iproute2,kmod
t0=$(date +%s)

# 1. Base root file system, cached in $VBOARD_BASE_CACHE (default $OUT; CI points it outside
# the clone) under a key hashing what builds it: the package list, the suite, the
# mmdebstrap options and the apt sources it reads. Rebuilt only when one of them changes.
BASE_CACHE=${VBOARD_BASE_CACHE:-$OUT}
mkdir -p "$BASE_CACHE"
BASE_CACHE=$(cd "$BASE_CACHE" && pwd)
SUITE=bookworm
MMDEBSTRAP_OPTS=(--quiet --variant=minbase --include="$PACKAGES"
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias')
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -s "$f" ] && sources+=("$f")
done
key=$( { printf '%s\n' "$SUITE" "${MMDEBSTRAP_OPTS[@]}"; cat "${sources[@]}"; } | sha256sum | cut -c1-16)
BASE="$BASE_CACHE/base-$key"
exec 9>"$BASE_CACHE/.lock"
flock 9  # one build of the base at a time (CI runs sharing the cache)
if [ ! -d "$BASE" ]; then
  rm -rf "$BASE.tmp"
  echo "vboard: mmdebstrap $SUITE ($PACKAGES) into $BASE"
  mmdebstrap "${MMDEBSTRAP_OPTS[@]}" "$SUITE" "$BASE.tmp" "${sources[@]}"
  mv "$BASE.tmp" "$BASE"
  # Older bases are of no further use: the key names what built them.
  find "$BASE_CACHE" -maxdepth 1 -name 'base-*' ! -name "base-$key" -exec rm -rf {} +
  echo "vboard: base built in $(( $(date +%s) - t0 )) s"
else
  echo "vboard: base from the cache ($BASE)"
fi
flock -u 9

# 2. The agent as wheels: otaguard itself and the base (agent) dependencies only.
rm -rf "$OUT/wheels"
"$PY" -m pip wheel --quiet --wheel-dir "$OUT/wheels" "$REPO[agent]"

# 3. One slot image per version.
tree="$OUT/tree"
cleanup() {
  for m in dev/pts dev proc sys; do mountpoint -q "$tree/$m" && umount -l "$tree/$m"; done
  return 0
}
trap cleanup EXIT
for v in "${VERSIONS[@]}"; do
  ver=${v%%-fail}
  cleanup; rm -rf "$tree"; mkdir -p "$tree"
  cp -a "$BASE/." "$tree/"
  mkdir -p "$tree/tmp/wheels"; cp "$OUT"/wheels/*.whl "$tree/tmp/wheels/"
  mount --bind /dev "$tree/dev"; mount -t proc proc "$tree/proc"; mount -t sysfs sys "$tree/sys"
  # A clean environment: the host's PIP_* settings name paths that are not in the chroot.
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$tree" python3 -m venv /opt/otaguard
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$tree" /opt/otaguard/bin/pip install --quiet --no-index --find-links /tmp/wheels 'otaguard[agent]'
  cleanup
  rm -rf "$tree/tmp/wheels"
  ln -sf /opt/otaguard/bin/otaguard "$tree/usr/bin/otaguard"
  cp -a "$HERE/overlay/." "$tree/"
  install -m 0644 "$REPO/deploy/systemd/otaguard-mark-good.service" "$REPO/deploy/systemd/otaguard-agent.service" \
    "$REPO/deploy/systemd/otaguard-measure-boot.service" "$tree/etc/systemd/system/"
  echo "$ver" > "$tree/etc/vboard-version"
  if [ "$v" != "$ver" ]; then  # a release whose health check fails
    sed -i 's|^ExecStart=.*|ExecStart=/bin/sh -c "echo OTAG-HEALTH: failing on purpose >/dev/ttyS0; exit 1"|' \
      "$tree/etc/systemd/system/vboard-health.service"
  fi
  mkdir -p "$tree/boot/efi" "$tree/var/lib/otaguard"
  : > "$tree/etc/machine-id"
  chroot "$tree" systemctl enable --quiet systemd-networkd.service systemd-networkd-wait-online.service \
    otaguard-measure-boot.service otaguard-mark-good.service vboard-health.service vboard-control.service
  chroot "$tree" systemctl mask --quiet getty@tty1.service serial-getty@ttyS0.service
  used=$(du -sm "$tree" | cut -f1)
  size=$(( used * 115 / 100 + 48 ))
  [ "$size" -le "$SLOT_MB" ] || { echo "vboard: $v needs $size MiB, the slot has $SLOT_MB" >&2; exit 1; }
  rm -f "$OUT/slot-$v.ext4"
  mke2fs -q -t ext4 -d "$tree" -L rootfs -b 4096 -E root_owner=0:0 "$OUT/slot-$v.ext4" "${size}M"
  echo "vboard: slot-$v.ext4 (${size} MiB, ${used} MiB used)"
done
rm -rf "$tree"

# 4. GRUB EFI and the ESP.
sed -e "s/@UUID_A@/$UUID_A/" -e "s/@UUID_B@/$UUID_B/" "$HERE/grub.cfg" > "$OUT/grub.cfg"
printf 'configfile (hd0,gpt1)/EFI/BOOT/grub.cfg\n' > "$OUT/stub.cfg"
grub-mkstandalone -O x86_64-efi -o "$OUT/BOOTX64.EFI" \
  --modules="part_gpt fat ext2 loadenv test echo halt reboot linux normal configfile" \
  "boot/grub/grub.cfg=$OUT/stub.cfg"
rm -f "$OUT/grubenv"
grub-editenv "$OUT/grubenv" create
grub-editenv "$OUT/grubenv" set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0
rm -f "$OUT/esp.vfat"; truncate -s "${ESP_MB}M" "$OUT/esp.vfat"
mkfs.vfat -n ESP "$OUT/esp.vfat" >/dev/null
mmd -i "$OUT/esp.vfat" ::/EFI ::/EFI/BOOT
mcopy -i "$OUT/esp.vfat" "$OUT/BOOTX64.EFI" "$OUT/grub.cfg" ::/EFI/BOOT/
mcopy -i "$OUT/esp.vfat" "$OUT/grubenv" ::/grubenv

# 5. The disk: GPT by sfdisk, partitions copied in at their offsets (no loop device).
rm -f "$OUT/disk.img"
truncate -s $(( 1 + ESP_MB + 2 * SLOT_MB + DATA_MB + 1 ))M "$OUT/disk.img"
sfdisk -q "$OUT/disk.img" <<SFDISK
label: gpt
unit: sectors
start=2048, size=$(( ESP_MB * 2048 )), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp
size=$(( SLOT_MB * 2048 )), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$UUID_A, name=rootfs_a
size=$(( SLOT_MB * 2048 )), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$UUID_B, name=rootfs_b
size=$(( DATA_MB * 2048 )), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=data
SFDISK
put() {  # put FILE PARTNO: copy a partition image to its offset
  local start; start=$(partx -g -o START -n "$2" "$OUT/disk.img" | tr -d ' ')
  dd if="$1" of="$OUT/disk.img" bs=512 seek="$start" conv=notrunc,sparse status=none
}
put "$OUT/esp.vfat" 1
put "$OUT/slot-${VERSIONS[0]}.ext4" 2
echo "vboard: disk.img built in $(( $(date +%s) - t0 )) s (slot A: ${VERSIONS[0]})"
