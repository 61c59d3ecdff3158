"""``omni-shim``: run one OmniNode node (placeholder until the node lands)."""


def main() -> int:
    raise SystemExit("omni-shim: not built yet")
