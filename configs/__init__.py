"""The shipped YAML configs, installed as package data of ``duetto.configs`` (read them with
``importlib.resources.files("duetto.configs")``; each file begins with the command that runs it)."""
