"""The command-line tool `gradcam-tut` and its plumbing: the notebooks run, settings decided once
per run, result folders, dataset layouts and loading, the mini fish set, explain and audit.

It imports the lesson's library (`gradcam_tut`), never the other way round. README's Layout
section lists its files, bottom up."""
