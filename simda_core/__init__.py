"""SimDA's implementation: ``model`` (the method), ``host`` (the one boundary to ComfyUI),
``video`` (clip utilities), ``training`` (adapter training), ``formats`` (adapter files)."""
