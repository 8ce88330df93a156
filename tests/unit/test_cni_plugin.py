import json
import subprocess
import sys

import pytest

from noded.cni.plugin import CniFailure, run

PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.244.1.2/24"}]}
ENV = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/x"}


def conf(**extra):
    return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "noded-cni", **extra})


def test_add_passes_prev_result_through():
    code, out = run({**ENV, "CNI_COMMAND": "ADD"}, conf(prevResult=PREV))
    assert code == 0 and json.loads(out) == PREV


def test_version():
    _code, out = run({"CNI_COMMAND": "VERSION"}, "")
    assert "1.1.0" in json.loads(out)["supportedVersions"]


@pytest.mark.parametrize(
    ("env", "stdin", "code"),
    [
        ({**ENV, "CNI_COMMAND": "ADD"}, "{not json", 6),
        ({**ENV, "CNI_COMMAND": "ADD"}, conf(), 7),  # no prevResult
        ({**ENV, "CNI_COMMAND": "ADD"}, conf(cniVersion="9.9.9"), 1),
        ({"CNI_COMMAND": "ADD"}, conf(prevResult=PREV), 4),  # no CNI_CONTAINERID
        ({**ENV}, conf(), 4),  # no CNI_COMMAND
    ],
)
def test_errors_carry_spec_codes(env, stdin, code):
    with pytest.raises(CniFailure) as e:
        run(env, stdin)
    assert e.value.code == code


def test_binary_prints_error_json_never_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "noded.cni.plugin"],
        input="{bad",
        text=True,
        env={**ENV, "CNI_COMMAND": "ADD"},
        capture_output=True,
    )
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == 6 and "Traceback" not in proc.stderr


def test_del_without_netns_succeeds():
    env = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_COMMAND": "DEL"}
    assert run(env, conf()) == (0, "")


K8S_ENV = {**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart"}


def test_unreachable_daemon_fails_closed_for_every_pod_unless_fail_policy_open(tmp_path):
    """Issue 17, item 8: with the daemon down, ADD succeeded uncaptured for a pod enrolled by its own label
    (the plugin cannot see pod labels): now no pod starts behind noded's back."""
    stdin = conf(prevResult=PREV, socket=str(tmp_path / "noded.sock"))
    with pytest.raises(CniFailure) as e:
        run({**K8S_ENV, "CNI_COMMAND": "ADD"}, stdin)
    assert e.value.code == 11  # try again later
    assert not (tmp_path / "pending").exists()
    open_conf = conf(prevResult=PREV, socket=str(tmp_path / "noded.sock"), failPolicy="open")
    code, out = run({**K8S_ENV, "CNI_COMMAND": "ADD"}, open_conf)
    assert code == 0 and json.loads(out) == PREV
    pending = json.loads((tmp_path / "pending" / "c1.json").read_text())  # taken at the daemon's next start
    assert pending["namespace"] == "shop" and pending["ips"] == ["10.244.1.2"]
    assert run({**K8S_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, stdin) == (0, "")
    assert not (tmp_path / "pending" / "c1.json").exists()
    with pytest.raises(CniFailure) as e:
        run({**K8S_ENV, "CNI_COMMAND": "STATUS"}, stdin)
    assert e.value.code == 50


def test_the_daemon_refuses_a_pod_it_has_not_seen_yet_and_the_plugin_says_try_again(tmp_path):
    """Issue 17, item 8: with the Pod/Namespace not yet seen, the pod got DNS-only capture after 2 s."""
    from noded.model.pods import Enrollment
    from noded.redirect.manager import PodManager

    manager = PodManager(str(tmp_path), Enrollment("node1"), None, wait_for_pod=lambda _ns, _name: False)
    reply = manager.add({"containerId": "c1", "netns": "/proc/self/ns/net", "namespace": "shop", "name": "cart"})
    assert reply["ok"] is False and reply["retry"] is True and "not known" in reply["error"]
    assert list((tmp_path / "pods").iterdir()) == []


def test_bad_fail_policy_and_socket_are_config_errors():
    for extra in ({"failPolicy": "maybe"}, {"socket": "relative.sock"}):
        with pytest.raises(CniFailure) as e:
            run({**K8S_ENV, "CNI_COMMAND": "ADD"}, conf(prevResult=PREV, **extra))
        assert e.value.code == 7


@pytest.mark.parametrize("cid", ["../../etc/x", "/abs", ".hidden", "a/b", "..", "a\nb", "ä"])
def test_a_container_id_that_could_escape_the_state_directory_is_refused(tmp_path, cid):
    """Issue 17, item 13: containerId with ../ or a leading / named files outside the state directory."""
    stdin = conf(prevResult=PREV, socket=str(tmp_path / "noded.sock"))
    for command in ("ADD", "DEL", "CHECK"):
        with pytest.raises(CniFailure) as e:
            run({**K8S_ENV, "CNI_CONTAINERID": cid, "CNI_COMMAND": command}, stdin)
        assert e.value.code == 4
    assert list(tmp_path.iterdir()) == []


def test_the_daemon_refuses_such_a_container_id_too(tmp_path):
    from noded.redirect.manager import PodManager

    manager = PodManager(str(tmp_path), None, None)  # refused before enrollment or the proxy are asked
    for req in ({"containerId": "../../x", "netns": "/proc/self/ns/net", "namespace": "a", "name": "b"},):
        assert manager.add(req)["ok"] is False
        assert manager.delete(req)["ok"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pending", "pods"]


@pytest.mark.parametrize(
    "prev",
    [
        {"cniVersion": "1.0.0", "ips": [{"address": 5}]},
        {"cniVersion": "1.0.0", "ips": ["10.0.0.1/24"]},
        {"cniVersion": "1.0.0", "ips": [None], "interfaces": []},
    ],
)
def test_a_malformed_prev_result_is_a_cni_error_not_a_crash(prev):
    with pytest.raises(CniFailure) as e:
        run({**K8S_ENV, "CNI_COMMAND": "ADD"}, conf(prevResult=prev))
    assert e.value.code == 6
    proc = subprocess.run(
        [sys.executable, "-m", "noded.cni.plugin"],
        input=conf(prevResult=prev),
        text=True,
        env={**K8S_ENV, "CNI_COMMAND": "ADD"},
        capture_output=True,
    )
    assert json.loads(proc.stdout)["code"] == 6 and "Traceback" not in proc.stderr
