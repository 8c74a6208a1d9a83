#!/usr/bin/env bash
# husk node installer: puts the shim, the VMM, the virtio-fs daemon and the
# guest image in place, installs the default husk.toml (keeping an existing
# one) and adds husk's runtime to containerd's CRI plugin in
# /etc/containerd/config.toml (a marked block, see containerd-husk.toml).
#
#   deploy/install.sh [--root DIR] [--bin-dir DIR] [--guest-dir DIR] [--uninstall]
#
# Run from a built checkout (`make build`) as root. --root installs under
# another root (packaging, tests). containerd must be restarted afterwards for
# the CRI runtime to appear; `ctr run --runtime io.containerd.husk.v2` works
# at once.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
root=""
bin_dir="/usr/local/bin"
guest_src="${HUSK_GUEST_DIR:-/var/lib/husk/guest}"
target="${CARGO_TARGET_DIR:-$repo/target}/release"
uninstall=0

die() { echo "husk install: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
	case "$1" in
	--root) root="${2:?--root needs a directory}"; shift 2 ;;
	--bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
	--guest-dir) guest_src="${2:?--guest-dir needs a directory}"; shift 2 ;;
	--uninstall) uninstall=1; shift ;;
	-h|--help) sed -n '2,12p' "$0"; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done

bins=(containerd-shim-husk-v2 husk-jailer husk-vmm husk-virtiofsd)
dst_bin="$root$bin_dir"
dst_guest="$root/var/lib/husk/guest"
dst_conf="$root/etc/husk/husk.toml"
# Left by installers before the runtime moved into config.toml.
old_dropin="$root/etc/containerd/conf.d/husk.toml"
main_conf="$root/etc/containerd/config.toml"
begin="# BEGIN husk (added by husk's deploy/install.sh; --uninstall removes it)"

# config.toml without husk's block.
strip_block() { sed '/^# BEGIN husk/,/^# END husk/d' "$main_conf"; }

if [ "$uninstall" = 1 ]; then
	for b in "${bins[@]}"; do rm -f "$dst_bin/$b"; done
	rm -f "$old_dropin" "$dst_guest/vmlinux" "$dst_guest/initramfs.cpio"
	rm -rf "$root/var/lib/husk/templates"
	if [ -f "$main_conf" ]; then
		strip_block >"$main_conf.husk-tmp" && mv "$main_conf.husk-tmp" "$main_conf"
	fi
	echo "husk install: removed binaries, guest image, templates and the husk runtime from $main_conf"
	echo "husk install: kept $dst_conf (remove it yourself if it is no longer wanted)"
	exit 0
fi

for b in "${bins[@]}"; do
	[ -x "$target/$b" ] || die "$target/$b is missing: run 'make build' first"
done
for f in vmlinux initramfs.cpio; do
	[ -f "$guest_src/$f" ] || die "$guest_src/$f is missing: run 'make guest-image' first"
done
if [ -z "$root" ] && [ ! -c /dev/kvm ]; then
	echo "husk install: warning: /dev/kvm is missing; husk pods cannot start on this node" >&2
fi

if [ -f "$main_conf" ]; then
	grep -Eq '^[[:space:]]*version[[:space:]]*=[[:space:]]*2' "$main_conf" ||
		die "$main_conf is not a version 2 config: add the table in deploy/containerd-husk.toml by hand"
	if strip_block | grep -q 'containerd\.runtimes\.husk\]'; then
		die "$main_conf already defines a husk runtime outside husk's block: remove it first"
	fi
fi

install -d "$dst_bin" "$dst_guest" "$(dirname "$dst_conf")" "$(dirname "$main_conf")"
for b in "${bins[@]}"; do
	install -m 0755 "$target/$b" "$dst_bin/$b"
done
if [ "$(cd "$guest_src" && pwd -P)" != "$(mkdir -p "$dst_guest" && cd "$dst_guest" && pwd -P)" ]; then
	install -m 0644 "$guest_src/vmlinux" "$guest_src/initramfs.cpio" "$dst_guest/"
fi
# Templates made from an older guest image are keyed differently and would
# only take space.
rm -rf "$root/var/lib/husk/templates"
if [ -e "$dst_conf" ]; then
	echo "husk install: keeping existing $dst_conf"
else
	install -m 0644 "$here/husk.toml" "$dst_conf"
fi
rm -f "$old_dropin"

# The husk runtime goes into config.toml itself, replacing an earlier block.
if [ -f "$main_conf" ]; then base="$(strip_block)"; else base="version = 2"; fi
{
	printf '%s\n\n%s\n' "$base" "$begin"
	if ! printf '%s\n' "$base" | grep -q 'containerd\.runtimes\.'; then
		# Naming any runtime drops containerd's built-in runc one: keep it.
		printf '%s\n' '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]' \
			'  runtime_type = "io.containerd.runc.v2"'
	fi
	grep -v '^#' "$here/containerd-husk.toml"
	printf '# END husk\n'
} >"$main_conf.husk-tmp"
mv "$main_conf.husk-tmp" "$main_conf"

echo "husk install: installed ${bins[*]} in $dst_bin, guest image in $dst_guest"
echo "husk install: added the husk runtime to $main_conf"
echo "husk install: restart containerd, then apply deploy/runtimeclass.yaml in the cluster"
