"""What the Kubernetes and KServe manifest tests share."""

from __future__ import annotations

# The Kubernetes version whose schemas (kubernetes-validate) every manifest and pod spec is validated against.
K8S_VERSION = "1.33.0"
