"""Security policy audits and the packet explainer.

* `packet` — frames built from a description or read from pcap, and read
  as nft reads them;
* `explain` — one frame walked through a port's compiled rules;
* `findings` — what an audit reports, and its table, JSON and SARIF forms;
* `drift` — the kernel's read-back against a fresh compile, and the
  preconditions the rules depend on;
* `exposure` — what the compiled rules let a guest do (spoofing, rogue
  DHCP, router advertisements), decided by explaining probe frames;
* `hygiene` — shadowed rules, unused and missing filters, parameters;
* `stats` — per-rule counters read back from the kernel;
* `run` — an audit of a root's ports, as the API serves it.

Nothing here imports the command line; modules load lazily from the API.
"""
