"""dta-ttfs: temporal-coded spiking neural networks with a dynamic firing threshold."""

from dta_ttfs.functional import dta, relu1, to_activations, to_spike_times
from dta_ttfs.models import ARCHITECTURES, build_network, count_neurons

__all__ = ["ARCHITECTURES", "build_network", "count_neurons", "dta", "relu1", "to_activations", "to_spike_times"]
__version__ = "0.1.0"
