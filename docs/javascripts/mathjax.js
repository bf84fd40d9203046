// MathJax settings for pymdownx.arithmatex (generic mode). MathJax itself is served by the site
// (scripts/mkdocs_mathjax.py copies it there); it typesets each page once, when Material's
// document$ says the page is there (on load and after each instant navigation).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
  // No typesetting at start-up: clearing the output cache after it (below) would drop the
  // glyphs' styles of the maths already typeset, leaving blank space where formulas belong.
  startup: { typeset: false },
};

document$.subscribe(() => {
  MathJax.startup.promise.then(() => {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    return MathJax.typesetPromise();
  });
});
