"""`make image`'s OCI archive writer (image/build.py) on a tiny root: what `ctr images import` and `podman
load` read. (The whole image was built here and run by podman: `noded version` from it printed the
checkout's version; see the README.)"""

import hashlib
import json
import tarfile

from image import build


def test_the_archive_is_an_oci_image_layout_whose_digests_hold(tmp_path):
    root = tmp_path / "rootfs"
    (root / "opt" / "noded").mkdir(parents=True)
    (root / "opt" / "noded" / "hello").write_text("hi")
    blob, diff_id = build.layer(str(root))
    out = tmp_path / "image.tar"
    build.oci_archive(blob, diff_id, str(out))
    with tarfile.open(out) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1], name
    index = json.loads(files["index.json"])
    ref = index["manifests"][0]
    assert ref["annotations"]["io.containerd.image.name"] == "docker.io/library/noded:latest"
    manifest = json.loads(files["blobs/sha256/" + ref["digest"].split(":")[1]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    assert config["rootfs"]["diff_ids"] == [diff_id] and config["config"]["Entrypoint"] == ["noded"]
    layer = files["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    assert manifest["layers"][0]["size"] == len(layer) == len(blob)
