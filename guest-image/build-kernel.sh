#!/usr/bin/env bash
# Build husk's guest kernel (uncompressed vmlinux for PVH direct boot) from
# Debian's linux-source package, husk's config fragment and husk's patches.
#
# The result is cached outside the source tree, keyed by a hash of everything
# that goes into it (source package version, fragment, patches, this script),
# so a kernel is built once per change, not once per clone:
#
#   $HUSK_CACHE_DIR/kernel/<key>/{vmlinux,config,System.map}
#
# and installed into the guest directory that husk-vmm and the shim read by
# default ($HUSK_GUEST_DIR, /var/lib/husk/guest).
#
# `--flavour profiling` builds the same kernel with frame pointers
# (kernel/profiling.config on top of husk.config), so that husk-vmm's guest
# profiler walks kernel stacks, and installs it into $HUSK_GUEST_DIR/profiling.
# It is not the default because frame pointers make emulated guest kernel
# code ~15% slower here (docs/profiling.md).
#
# Usage: build-kernel.sh [--flavour default|profiling] [--print-key]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${HUSK_CACHE_DIR:-/var/cache/husk}
guest_dir=${HUSK_GUEST_DIR:-/var/lib/husk/guest}
flavour=default
print_key=0
while [ $# -gt 0 ]; do
  case "$1" in
    --flavour) flavour=${2:-}; shift ;;
    --print-key) print_key=1 ;;
    *) printf 'guest-image: error: unknown argument %s\n' "$1" >&2; exit 2 ;;
  esac
  shift
done
fragments=("$here/kernel/husk.config")
case "$flavour" in
  default) ;;
  profiling) fragments+=("$here/kernel/profiling.config"); guest_dir="$guest_dir/profiling" ;;
  *) printf 'guest-image: error: unknown flavour %s (default or profiling)\n' "$flavour" >&2; exit 2 ;;
esac
src_pkg=${HUSK_LINUX_SOURCE_PKG:-linux-source-6.1}
jobs=${HUSK_KERNEL_JOBS:-$(nproc)}
# Reproducible builds: the same inputs give the same vmlinux on any machine
# (templates and caches are keyed by the image's contents).
export KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk KBUILD_BUILD_VERSION=1

log() { printf 'guest-image: %s\n' "$*" >&2; }
die() { printf 'guest-image: error: %s\n' "$*" >&2; exit 1; }

src_version=$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null) ||
  die "$src_pkg is not installed (apt-get install $src_pkg)"
# The build timestamp is the source package's, not the build's.
KBUILD_BUILD_TIMESTAMP=$(date -u -d "@$(stat -c %Y "$(dpkg-query -L "$src_pkg" | grep -E '\.tar\.xz$' | head -n1)")" '+%Y-%m-%d')
export KBUILD_BUILD_TIMESTAMP
tarball=$(dpkg-query -L "$src_pkg" | grep -E '/linux-source-[0-9.]+\.tar\.xz$' | head -n1)
[ -f "$tarball" ] || die "no source tarball found in package $src_pkg"

patches=("$here"/kernel/patches/*.patch)
key=$( {
  printf 'source %s %s\n' "$src_pkg" "$src_version"
  cat "${fragments[@]}"
  for p in "${patches[@]}"; do printf 'patch %s\n' "$(basename "$p")"; cat "$p"; done
  cat "$0"
} | sha256sum | cut -c1-16)

if [ "$print_key" = 1 ]; then
  echo "$key"
  exit 0
fi

out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ]; then
  log "kernel $key is cached ($out)"
else
  log "building kernel $key from $src_pkg $src_version (takes minutes)"
  mkdir -p "$cache/kernel"
  # One source tree per source version + patches: it never changes after it
  # is made, so the object directory below can build incrementally from it.
  src_key=$( {
    printf '%s %s\n' "$src_pkg" "$src_version"
    cat "${patches[@]}"
  } | sha256sum | cut -c1-16)
  src="$cache/kernel/src-$src_key"
  if [ ! -f "$src/.husk-ready" ]; then
    log "unpacking $tarball"
    rm -rf "$src" "$src.tmp"
    mkdir -p "$src.tmp"
    tar -xf "$tarball" -C "$src.tmp" --strip-components=1
    for p in "${patches[@]}"; do
      log "applying $(basename "$p")"
      patch -d "$src.tmp" -p1 --forward --quiet < "$p" || die "patch $(basename "$p") does not apply"
    done
    touch "$src.tmp/.husk-ready"
    mv "$src.tmp" "$src"
  fi

  # One object directory per flavour: each builds incrementally.
  obj="$cache/kernel/obj-$src_key"
  [ "$flavour" = default ] || obj="$obj-$flavour"
  mkdir -p "$obj"
  log "configuring (tinyconfig + $(for f in "${fragments[@]}"; do basename "$f"; done | paste -sd+))"
  make -s -C "$src" O="$obj" tinyconfig >/dev/null
  "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "${fragments[@]}" >/dev/null
  make -s -C "$src" O="$obj" olddefconfig >/dev/null

  # Every option the fragments ask for must have landed: a silently dropped
  # option (a missing dependency) would make a kernel that boots but lacks a
  # feature the agent relies on. A later fragment overrides an earlier one,
  # so only each option's last line counts.
  missing=0
  declare -A wanted=()
  order=()
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*) opt=${line%%=*} ;;
      "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *} ;;
      *) continue ;;
    esac
    [ -n "${wanted[$opt]+x}" ] || order+=("$opt")
    wanted[$opt]=$line
  done < <(cat "${fragments[@]}")
  for opt in "${order[@]}"; do
    line=${wanted[$opt]}
    case "$line" in
      CONFIG_*=*)
        grep -qxF "$line" "$obj/.config" || { log "config: wanted $line, got: $(grep -E "^(# )?${line%%=*}[= ]" "$obj/.config" || echo unset)"; missing=1; } ;;
      "# CONFIG_"*" is not set")
        opt=${line#\# }; opt=${opt%% *}
        if grep -qE "^$opt=" "$obj/.config"; then log "config: wanted $opt off, got: $(grep -E "^$opt=" "$obj/.config")"; missing=1; fi ;;
    esac
  done
  [ "$missing" = 0 ] || die "the config fragment did not apply cleanly (see above)"

  log "compiling vmlinux with $jobs jobs"
  start=$(date +%s)
  # Progress: kbuild prints one line per object; show a count every 200.
  make -C "$src" O="$obj" -j"$jobs" vmlinux 2>&1 |
    awk -v t0="$start" '
      /^  (CC|AS|LD|AR)/ { n++; if (n % 200 == 0) { printf "guest-image: ... %d objects built (%ds)\n", n, systime() - t0 > "/dev/stderr"; fflush("/dev/stderr") } ; next }
      /warning:|error:|Error/ { print > "/dev/stderr" }
      END { printf "guest-image: %d objects built\n", n > "/dev/stderr" }'
  [ "${PIPESTATUS[0]}" = 0 ] || die "kernel build failed"
  log "built in $(( $(date +%s) - start ))s"

  rm -rf "$out.tmp"
  mkdir -p "$out.tmp"
  cp "$obj/vmlinux" "$out.tmp/vmlinux"
  cp "$obj/.config" "$out.tmp/config"
  cp "$obj/System.map" "$out.tmp/System.map"
  printf '%s %s\n' "$src_pkg" "$src_version" > "$out.tmp/source-version"
  rm -rf "$out"
  mv "$out.tmp" "$out"
fi

mkdir -p "$guest_dir"
for f in vmlinux config System.map; do
  cp "$out/$f" "$guest_dir/$f.tmp"
  mv "$guest_dir/$f.tmp" "$guest_dir/$f"
done
echo "$key" > "$guest_dir/kernel-key"
log "kernel installed in $guest_dir/vmlinux ($(du -h "$guest_dir/vmlinux" | cut -f1))"
