// The wizard's page: checks one part of the form at a time, shows only the fields of the
// chosen options. The form also works without this script.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

function showChoices() {
  const stores = ($('input[name=stores]:checked') || {}).value;
  $$('.external').forEach((el) => { el.hidden = stores !== 'external'; });
  const tls = ($('input[name=tls]:checked') || {}).value;
  $$('.tls-acme').forEach((el) => { el.hidden = tls !== 'acme'; });
  $$('.tls-files').forEach((el) => { el.hidden = tls !== 'files'; });
  $$('.tls-off').forEach((el) => { el.hidden = tls !== 'off'; });
}

async function check(fieldset) {
  const results = $('.results', fieldset);
  results.innerHTML = '<li class="running">checking…</li>';
  const body = new URLSearchParams(new FormData($('#settings')));
  try {
    const answer = await fetch('/wizard/check/' + fieldset.dataset.section, { method: 'POST', body, credentials: 'same-origin' });
    const found = await answer.json();
    results.innerHTML = '';
    if (!Array.isArray(found)) throw new Error(found.error || 'unexpected answer');
    if (!found.length) results.innerHTML = '<li class="ok">nothing to check here</li>';
    for (const c of found) {
      const li = document.createElement('li');
      li.className = c.status;
      li.dataset.setting = c.setting;
      li.textContent = `${c.setting}: ${c.detail}`;
      results.append(li);
    }
  } catch (e) {
    results.innerHTML = '';
    const li = document.createElement('li');
    li.className = 'failed';
    li.textContent = 'the check could not run: ' + e.message;
    results.append(li);
  }
}

document.addEventListener('DOMContentLoaded', () => {
  showChoices();
  $$('input[name=stores], input[name=tls]').forEach((el) => el.addEventListener('change', showChoices));
  $$('fieldset[data-section] .check').forEach((button) => button.addEventListener('click', () => check(button.closest('fieldset'))));
});
