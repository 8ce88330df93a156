"""Service VIP translation, kube-proxy's job: the Proxier protocol (proxier.py) and its three modes, each
taking its own change tracker's services from the model: eBPF (ebpf.py: a pure plan step, plan_frontend,
into noded/reconcile.py, and MapWrites), nftables and iptables (a pure renderer with its parser, nftrules.py /
iptrules.py; the proxier and its one tool; mirror.py: what was programmed), shared planning (plan.py,
slots.py), health-check servers, recording fakes for unit tests (fakes.py), and the
read-back view (`noded services`). Driven by noded/runner.py; their kernel calls are noded/kernel/'s."""
