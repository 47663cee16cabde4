"""The build pipeline: `build` takes one checkpoint through every stage (load, export, lower, engines,
validate) into one artifact, `build_all` does so for every head and precision a recipe set asks for,
`recipes` holds each head's defaults, `options` a build's options, and `publish` puts a validated
artifact in place so that no reader sees half of it. May import every stage before it (`model`,
`sources`, `export`, `precision`, `tensorrt`, `validation`), `exporter.flags`, `exporter.errors` and
`runtime`.
"""
