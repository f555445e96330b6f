"""Ansible's linear strategy run over Mitogen when it is installed, else plain SSH.

ansible.cfg selects this strategy. Mitogen for Ansible (the `mitogen` package, in
requirements-dev.txt) keeps one Python interpreter per host for the whole run and sends it
each module over its own connection, instead of starting Python on the host for every task:
a no-change deploy takes about a quarter less time (0.75x) (docs/PERFORMANCE.md, "Deploy levers").

Without the package, or with ANSIBLE_STRATEGY=linear, the deploy runs on Ansible's own
linear strategy over SSH (pipelining + ControlPersist, see ansible.cfg): the same plays, the
same results; the lab tests run one deploy that way so the fallback stays proven.
"""

from __future__ import annotations

try:
    from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule
except ImportError:  # no Mitogen on this controller: Ansible's own linear strategy
    from ansible.plugins.strategy.linear import StrategyModule
    from ansible.utils.display import Display

    Display().warning("Mitogen for Ansible is not installed (pip install -r requirements-dev.txt): "
                      "deploying over plain SSH, which is slower.")

__all__ = ["StrategyModule"]
