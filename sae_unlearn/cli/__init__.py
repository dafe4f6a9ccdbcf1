from sae_unlearn.cli.main import app as app
