"""Reports: strict JSON for machines, Markdown and self-contained HTML with plots for people."""
