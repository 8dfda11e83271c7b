"""rsd-runtime host: cluster launcher, driver and serving."""
from rsd_runtime.cluster import Cluster
from rsd_runtime.errors import CardDied, CardError, ClusterError


def __getattr__(name):  # LLM and SamplingParams pull in torch: import them only when asked for
    if name == "LLM":
        from rsd_runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from rsd_runtime.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)


__all__ = ["Cluster", "CardDied", "CardError", "ClusterError", "LLM", "SamplingParams"]
__version__ = "0.1.0"
