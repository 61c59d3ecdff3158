"""What can go wrong with a request the coordinator runs: the errors the HTTP adapters and
the node map to answers, and the ones its recovery loop acts on (shim/generation.py)."""

from __future__ import annotations


class CoordinatorError(RuntimeError):
    """A request cannot be served; the message is for the user."""


class ModelUnknown(CoordinatorError):
    """No node of the cluster has the model (HTTP 404)."""


class NodeLost(CoordinatorError):
    """A step failed in a way a lost node explains (probed before a recovery)."""


class LinkLost(NodeLost):
    """A link of the chain broke (the transport lost a node, or thought so): recover even
    if every node answers afterwards (a starved node falls silent, then comes back)."""


class Busy(CoordinatorError):
    """Too many requests queued for the model (HTTP 503)."""


class StageBusy(CoordinatorError):
    """A stage holds as many sequences as it may (other coordinators' too): retry later."""


class CacheMiss(CoordinatorError):
    """A stage no longer holds the prefix a sequence was to start from."""


class StageMissing(CoordinatorError):
    """A stage of the plan is no longer loaded (unloaded by its node, or by another
    coordinator's keep-alive): loading again and retrying serves the request."""
