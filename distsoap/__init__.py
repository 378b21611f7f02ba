"""distsoap: SOAP (Shampoo with Adam in the preconditioner's eigenbasis) for distributed PyTorch.

``from distsoap import SOAP`` is a drop-in replacement for the public reference implementation.
"""

from distsoap.math.reference import ReferenceSOAP
from distsoap.optimizer import SOAP

__all__ = ["SOAP", "ReferenceSOAP"]
__version__ = "0.1.0"
