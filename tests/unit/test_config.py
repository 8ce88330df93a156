import pytest

from noded.config import ConfigError, cgroup2_mount, load, parse


def test_defaults_for_every_key():
    cfg = parse({})
    assert cfg.services.mode == "ebpf"
    assert cfg.services.cgroupPath == cgroup2_mount()  # this machine's cgroup2, found in /proc/self/mounts
    assert cfg.dns.listen == ["169.254.20.10:53"]
    assert cfg.source.directory == "/etc/noded/manifests"
    assert cfg.bpffsPath == f"/sys/fs/bpf/noded/{cfg.nodeName}"
    assert cfg.clusterDomain == "cluster.local"


def test_full_example_from_design(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("""
apiVersion: noded.io/v1alpha1
kind: NodedConfiguration
nodeName: node1
source: {directory: /etc/noded/manifests}
clusterDomain: cluster.local
clusterCIDRs: [10.244.0.0/16]
services: {mode: ebpf, cgroupPath: /sys/fs/cgroup/unified, nodePortAddresses: []}
dns: {listen: ["169.254.20.10:53"], upstreams: []}
capture: {enabled: true}
api: {socket: /run/noded/noded.sock}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 0.0.0.0:10256
bpffsPath: /sys/fs/bpf/noded/node1
""")
    cfg = load(str(path))
    assert cfg.nodeName == "node1" and cfg.bpffsPath == "/sys/fs/bpf/noded/node1"


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"services": {"mode": "ipvs"}}, "services.mode"),
        ({"services": {"cgroupPth": "/x"}}, "services.cgroupPth: unknown key"),
        ({"clusterCIDRs": ["10.0.0.0/33"]}, "clusterCIDRs[0]"),
        ({"dns": {"listen": ["nonsense"]}}, "dns.listen[0]"),
        ({"capture": {"enabled": "yes"}}, "capture.enabled"),
        ({"metricsBindAddress": "127.0.0.1:99999"}, "metricsBindAddress"),
        ({"kind": "KubeProxyConfiguration"}, "kind"),
        ({"source": {"directory": "/a", "kubeconfig": "/b"}}, "source"),
        ({"services": "ebpf"}, "services: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(data, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        parse(data)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(bad))


def test_cgroup2_mount_found_in_unified_and_hybrid_layouts(tmp_path):
    unified = tmp_path / "unified"
    unified.write_text("sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n")
    assert cgroup2_mount(str(unified)) == "/sys/fs/cgroup"
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert cgroup2_mount(str(hybrid)) == "/sys/fs/cgroup/unified"
    none = tmp_path / "none"
    none.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    with pytest.raises(ConfigError, match="cgroupPath"):
        cgroup2_mount(str(none))


def test_node_name_from_node_name_else_the_lowercased_hostname(monkeypatch):
    """Issue 16, item 3: the raw hostname (not lowercased) was the default; NODE_NAME was not read."""
    import socket

    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "Worker-1.Example")
    assert parse({}).nodeName == "worker-1.example"
    monkeypatch.setenv("NODE_NAME", "node-7")
    assert parse({}).nodeName == "node-7"
    assert parse({"nodeName": "explicit"}).nodeName == "explicit"


def test_api_server_goes_with_in_cluster_and_is_https():
    cfg = parse({"source": {"inCluster": True, "apiServer": "https://10.0.0.1:6443"}})
    assert cfg.source.apiServer == "https://10.0.0.1:6443"
    bad_sources = (
        {"inCluster": True, "apiServer": "http://10.0.0.1:6443"},
        {"kubeconfig": "/k", "apiServer": "https://x"},
    )
    for bad in bad_sources:
        with pytest.raises(ConfigError, match=r"source\.apiServer"):
            parse({"source": bad})


def test_durations_as_kube_proxy_writes_them_and_kube_proxys_defaults():
    from noded.config import format_duration, parse_duration

    assert parse({}).services.minSyncPeriod == 1.0 and parse({}).services.syncPeriod == 30.0
    cfg = parse({"services": {"syncPeriod": "1m30s", "minSyncPeriod": "500ms"}, "tunnel": {"certTTL": "24h"}})
    assert (cfg.services.syncPeriod, cfg.services.minSyncPeriod, cfg.tunnel.certTTL) == (90.0, 0.5, 86400.0)
    assert parse({"services": {"syncPeriod": 15}}).services.syncPeriod == 15.0  # plain seconds still
    assert parse({"services": {"minSyncPeriod": "0s"}}).services.minSyncPeriod == 0.0
    for bad in ("30", "thirty", "5x", "-1s", True, "1s5"):
        with pytest.raises(ConfigError, match=r"services\.syncPeriod"):
            parse({"services": {"syncPeriod": bad}})
    assert [format_duration(s) for s in (30, 90, 0.5, 86400, 0, 3725)] == [
        "30s",
        "1m30s",
        "500ms",
        "24h",
        "0s",
        "1h2m5s",
    ]
    assert all(parse_duration(format_duration(s), "k") == s for s in (30, 90, 0.5, 86400, 0, 3725, 0.1))


def test_an_unknown_key_is_named_with_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"services\.syncPeriods: unknown key; did you mean 'syncPeriod'\?"):
        parse({"services": {"syncPeriods": "30s"}})
    with pytest.raises(ConfigError, match=r"nodename: unknown key; did you mean 'nodeName'\?"):
        parse({"nodename": "x"})
    with pytest.raises(ConfigError, match=r"zzz: unknown key$"):
        parse({"zzz": 1})


def test_a_config_file_must_say_what_it_is(tmp_path):
    from noded.config import load

    path = tmp_path / "c.yaml"
    body = "nodeName: n1\nsource: {directory: /x}\nservices: {cgroupPath: /x}\n"
    path.write_text(body)
    with pytest.raises(ConfigError, match="apiVersion: required"):
        load(str(path))
    path.write_text(f"apiVersion: noded.io/v1alpha1\n{body}")
    with pytest.raises(ConfigError, match="kind: required"):
        load(str(path))
    path.write_text(f"apiVersion: noded.io/v1alpha1\nkind: NodedConfiguration\n{body}")
    assert load(str(path)).nodeName == "n1"
