#!/usr/bin/env bash
# husk node installer: puts the shim, the VMM, the virtio-fs daemon and the
# guest image in place, installs the default husk.toml (keeping an existing
# one) and registers husk with containerd's CRI plugin through a drop-in.
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

bins=(containerd-shim-husk-v2 husk-vmm husk-virtiofsd)
dst_bin="$root$bin_dir"
dst_guest="$root/var/lib/husk/guest"
dst_conf="$root/etc/husk/husk.toml"
dst_dropin="$root/etc/containerd/conf.d/husk.toml"
main_conf="$root/etc/containerd/config.toml"

if [ "$uninstall" = 1 ]; then
	for b in "${bins[@]}"; do rm -f "$dst_bin/$b"; done
	rm -f "$dst_dropin" "$dst_guest/vmlinux" "$dst_guest/initramfs.cpio"
	rm -rf "$root/var/lib/husk/templates"
	echo "husk install: removed binaries, guest image, templates and the containerd drop-in"
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

install -d "$dst_bin" "$dst_guest" "$(dirname "$dst_conf")" "$(dirname "$dst_dropin")"
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
install -m 0644 "$here/containerd-husk.toml" "$dst_dropin"

echo "husk install: installed ${bins[*]} in $dst_bin, guest image in $dst_guest"
if [ -f "$main_conf" ] && grep -Eq '^[[:space:]]*imports[[:space:]]*=.*conf\.d' "$main_conf"; then
	echo "husk install: $main_conf imports the drop-in; restart containerd to enable the husk RuntimeClass handler"
else
	echo "husk install: add to $main_conf (version = 2):"
	echo '    imports = ["/etc/containerd/conf.d/*.toml"]'
	echo "husk install: then restart containerd, and apply deploy/runtimeclass.yaml in the cluster"
fi
