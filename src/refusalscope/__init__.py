"""refusalscope: find the SAE features that make a chat model refuse.

Implements Prakash et al., "Beyond I'm Sorry, I Can't: Dissecting LLM Refusal" (arXiv 2509.09708) on top of
Arditi et al.'s refusal direction (arXiv 2406.11717).
"""

from refusalscope.errors import RefusalScopeError

__version__ = "0.1.0"

__all__ = ["RefusalScopeError", "__version__"]
