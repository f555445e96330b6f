"""Base images: one debootstrap tree per distro and recipe, cached and shared by every lab.

Hosts never write to an image: each host is an overlayfs whose upper dir is its own disk.
The cache path carries a hash of the recipe, so changing the package list or the debootstrap
arguments builds a new image instead of silently reusing a stale one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .util import LabError, run

CACHE = Path("/var/cache/taskfleet-lab/images")
MIRROR = "http://deb.debian.org/debian"
DISTROS = {"bookworm": "Debian 12", "trixie": "Debian 13"}
DEFAULT_DISTRO = "bookworm"
# What a fresh Debian cloud VM has that Ansible needs: systemd as init, sshd, python3.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
    "iproute2", "procps", "sudo", "ca-certificates",
)
DEBOOTSTRAP_ARGS = ("--variant=minbase",)
# Bump when finish() changes, so existing caches are rebuilt with the new steps.
FINISH_VERSION = 1
BUILD_INFO = ".lab-build.json"


def recipe_hash(distro: str) -> str:
    recipe = {"distro": distro, "packages": PACKAGES, "args": DEBOOTSTRAP_ARGS,
              "mirror": MIRROR, "finish": FINISH_VERSION}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def image_dir(distro: str) -> Path:
    return CACHE / f"{distro}-{recipe_hash(distro)}"


def check_distro(distro: str) -> None:
    if distro not in DISTROS:
        raise LabError(f"unknown distro {distro!r}", f"use one of: {', '.join(DISTROS)}")


def finish(root: Path) -> None:
    """Make the tree a clean template: nothing host-specific may be shared by all hosts."""
    # Every host gets its own SSH host keys and machine-id (generated per host / at first boot).
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_symlink() or dbus_id.exists():
        dbus_id.unlink()
    # networkd brings up the static address the lab writes per host; ssh is enabled by its
    # package already, enabling it again is harmless and documents the dependency.
    run(["chroot", str(root), "systemctl", "enable", "systemd-networkd", "ssh"])
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


def ensure_image(distro: str, log=print) -> float | None:
    """Build the image for distro unless cached. Returns build seconds, or None if cached.

    A flock serialises builders across processes (two labs coming up at once build once);
    the tree is built in a temp dir and renamed into place, so a killed build never leaves
    a half image that looks complete.
    """
    check_distro(distro)
    final = image_dir(distro)
    if final.is_dir():
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # another process built it while we waited
            return None
        tmp = CACHE / f".tmp-{final.name}-{os.getpid()}"
        for stale in CACHE.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock
        log(f"lab: building {distro} image (debootstrap, about a minute) -> {final}")
        start = time.monotonic()
        try:
            run(["debootstrap", *DEBOOTSTRAP_ARGS, f"--include={','.join(PACKAGES)}",
                 distro, str(tmp), MIRROR], timeout=1200)
            finish(tmp)
            took = time.monotonic() - start
            (tmp / BUILD_INFO).write_text(json.dumps({"distro": distro, "seconds": round(took, 1),
                                                      "built": time.time()}))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"lab: {distro} image built in {took:.0f} s")
        return took


def ensure_images(distros, log=print) -> dict[str, float | None]:
    """Build the needed images in parallel (debootstrap is mostly waiting on the network)."""
    wanted = list(dict.fromkeys(distros))
    with ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:
        futures = {d: pool.submit(ensure_image, d, log) for d in wanted}
        return {d: f.result() for d, f in futures.items()}
