"""`make image`: noded's OCI image built here, with no registry and no container engine.

The base is Debian bookworm debootstrapped (minbase) from the mirror apt uses, with what noded runs:
python3 (a venv in /opt/noded), libbpf1, nftables, iptables, iproute2. noded goes in from its wheel (with
the BPF objects and the static noded-cni) and its dependencies' wheels, built from this checkout, so
the image's noded is exactly this checkout's. One layer, written as an OCI image archive
(oci-layout, index.json, blobs/sha256/...) at build/noded-image.tar, which `ctr -n k8s.io images import`
and `podman load` take as `noded:latest` (image/Containerfile is the same for those with a registry).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "image")
ROOTFS = os.path.join(BUILD, "rootfs")
OUT = os.path.join(ROOT, "build", "noded-image.tar")
NAME = "noded:latest"
PACKAGES = "python3,python3-venv,libbpf1,nftables,iptables,iproute2,ca-certificates"
PATH = "/opt/noded/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def say(msg: str) -> None:
    print(f"image: {msg}", flush=True)


def mirror() -> str:
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        try:
            with open(path) as f:
                for line in f:
                    words = line.split()
                    if words[:1] == ["URIs:"] or words[:1] == ["deb"]:
                        return words[1]
        except OSError:
            continue
    return "http://deb.debian.org/debian"


def base() -> None:
    if os.path.exists(os.path.join(ROOTFS, ".debootstrap-done")):
        return
    shutil.rmtree(ROOTFS, ignore_errors=True)
    os.makedirs(ROOTFS)
    say(f"debootstrap bookworm (minbase) from {mirror()}")
    log = os.path.join(BUILD, "debootstrap.log")
    with open(log, "w") as f:
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", ROOTFS, mirror()],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if res.returncode:
        sys.exit(f"image: debootstrap failed, see {log}")
    open(os.path.join(ROOTFS, ".debootstrap-done"), "w").close()


def noded() -> None:
    wheels = os.path.join(BUILD, "wheels")
    shutil.rmtree(wheels, ignore_errors=True)
    pip = os.path.join(ROOT, ".venv", "bin", "pip")
    shutil.rmtree(os.path.join(ROOT, "build", "lib"), ignore_errors=True)
    say("wheels: noded (this checkout, BPF objects and the static noded-cni in it) and its dependencies")
    subprocess.run([pip, "wheel", "-q", "--wheel-dir", wheels, ROOT], check=True, cwd=ROOT)
    inside = os.path.join(ROOTFS, "tmp", "wheels")
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(wheels, inside)
    venv = "/opt/noded/venv"
    shutil.rmtree(os.path.join(ROOTFS, venv.lstrip("/")), ignore_errors=True)
    say("noded into /opt/noded/venv (offline, from the wheels)")
    for argv in (
        ["python3", "-m", "venv", venv],
        [f"{venv}/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels", "noded"],
    ):
        subprocess.run(["chroot", ROOTFS, *argv], check=True, env={"PATH": PATH, "HOME": "/root"})
    shutil.rmtree(inside)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for name in os.listdir(os.path.join(ROOTFS, junk)):
            path = os.path.join(ROOTFS, junk, name)
            if os.path.isfile(path) and not name.startswith("lock"):
                os.unlink(path)


def layer(rootfs: str = ROOTFS) -> tuple[bytes, str]:
    """The rootfs as one gzipped tar layer: (blob, diff_id of the uncompressed tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(rootfs)):
            if name in (".debootstrap-done", "proc", "sys", "dev"):
                continue
            tar.add(os.path.join(rootfs, name), arcname=name)
        for name in ("proc", "sys", "dev", "run/noded"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    data = raw.getvalue()
    return gzip.compress(data, compresslevel=6, mtime=0), "sha256:" + hashlib.sha256(data).hexdigest()


def oci_archive(blob: bytes, diff_id: str, out: str = OUT) -> None:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["noded"],
            "Cmd": ["run", "--config", "/etc/noded/config.yaml"],
            "Env": [f"PATH={PATH}"],
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "image/build.py: debootstrap bookworm + noded's wheels"}],
    }
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    config_ref = {"mediaType": "application/vnd.oci.image.config.v1+json", **put(json.dumps(config).encode())}
    layer_ref = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(blob)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_ref,
        "layers": [layer_ref],
    }
    manifest_ref = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(json.dumps(manifest).encode())}
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                **manifest_ref,
                "annotations": {
                    "org.opencontainers.image.ref.name": "latest",
                    "io.containerd.image.name": f"docker.io/library/{NAME}",
                },
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        files = {
            "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
            "index.json": json.dumps(index).encode(),
        }
        files.update({f"blobs/sha256/{d.split(':')[1]}": data for d, data in blobs.items()})
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    say(f"{out}: {NAME}, {len(blob) / 2**20:.0f} MiB layer, manifest {manifest_ref['digest'][:19]}")


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("image: debootstrap and chroot need root")
    os.makedirs(BUILD, exist_ok=True)
    base()
    noded()
    blob, diff_id = layer()
    oci_archive(blob, diff_id)


if __name__ == "__main__":
    main()
