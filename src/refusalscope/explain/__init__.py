"""Feature explanations (paper, Tables 4, 7, 8, 10, 11): Neuronpedia, local top-activating contexts, an optional
OpenAI-compatible LLM explainer, an offline one-line fallback, and the feature-semantics tables."""
