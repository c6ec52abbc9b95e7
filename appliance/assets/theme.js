// The colour scheme chosen with the header's toggle, applied before the page paints
// (loaded in <head>, not deferred); without a choice the system's scheme applies.
'use strict';
try {
  const theme = localStorage.getItem('km-theme');
  if (theme === 'dark' || theme === 'light') document.documentElement.dataset.theme = theme;
} catch (_) { /* storage refused: the system's scheme */ }
