"""rsd-runtime host: cluster launcher, driver and serving."""
from rsd_runtime.cluster import Cluster
from rsd_runtime.errors import CardDied, CardError, ClusterError

__all__ = ["Cluster", "CardDied", "CardError", "ClusterError"]
__version__ = "0.1.0"
