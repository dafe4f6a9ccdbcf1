from sae_unlearn.cli.main import app

app(prog_name="sae-unlearn")
