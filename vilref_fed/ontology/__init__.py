"""The consortium's expert knowledge: label list, synonyms per language, descriptors for zero-shot prompts."""

from vilref_fed.ontology.loader import DEFAULT_PATH, load_ontology, normalise_term
from vilref_fed.ontology.model import Label, Ontology, OntologyError

__all__ = ["DEFAULT_PATH", "Label", "Ontology", "OntologyError", "load_ontology", "normalise_term"]
