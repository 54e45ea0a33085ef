"""metaloss: meta-learning what shapes training, as one bilevel engine.

min_phi  L_outer(w*(phi), phi)   with   w*(phi) = InnerOpt_T(L_inner(., phi), w0(phi))
"""

from metaloss.types import Episode, HypergradOut, Params

__all__ = ["Episode", "HypergradOut", "Params"]
__version__ = "0.1.0"
