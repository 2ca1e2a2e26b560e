# Sourced by scripts/arm64-check.sh and scripts/build-wheels.sh: /proc and /dev mounted into the
# arm64 root ($ROOT) for chroot, shared by every run using the root at the same time. Each run
# registers its pid under $ROOT/.pyedge-users; the last one to leave unmounts, so a quick check
# that ends does not pull /proc from under a multi-hour `--full` run. No /sys: the host's x86
# sysfs CPU topology crashes onnxruntime's cpuinfo under qemu.
root_mounts_acquire() {
  mkdir -p "$ROOT/.pyedge-users"
  : > "$ROOT/.pyedge-users/$$"
  ( flock 8
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev" ) 8> "$ROOT/.pyedge-mount.lock"
}

root_mounts_release() {
  ( flock 8
    rm -f "$ROOT/.pyedge-users/$$"
    local f live=0
    for f in "$ROOT/.pyedge-users"/*; do
      [ -e "$f" ] || continue
      if kill -0 "${f##*/}" 2>/dev/null; then live=$((live + 1)); else rm -f "$f"; fi  # stale: gone
    done
    if [ $live = 0 ]; then
      for m in dev proc; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m" || true; done
    fi ) 8> "$ROOT/.pyedge-mount.lock"
}
