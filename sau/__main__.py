from sau.cli import entry

entry()
