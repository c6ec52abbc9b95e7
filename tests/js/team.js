'use strict'
// Teams in a real browser (Debian's Chromium through playwright-core) against km with a
// real SMTP server. Run by tests/tests/dashboard.rs, which reads the mails: the script
// asks for the link of the latest mail to an address through `request-<n>.json` and
// reads `reply-<n>.json` ({"link", "subject"}).
//
// Steps:
//   1. the owner signs up (first account: admin) and creates a bucket;
//   2. invites an address without an account from the settings ("Add or invite"): the
//      invitation is listed as pending; the mailed link opens the invitation page in a
//      fresh browser (no session), where the newcomer creates their account and lands on
//      the bucket; the owner's settings list them as developer, no invitation pending;
//   3. transfers the ownership to the newcomer: the members show them as owner and the
//      former owner as admin, and the newcomer got the mail;
//   4. a personal token: created and shown once, listed; it reads the API as a bearer
//      token and as a refresh token (the js-api's standalone strategy); revoked, both
//      are refused;
//   5. the accounts page (admin): a password reset mailed to the newcomer, whose link sets
//      a new password and signs them in; disabled, the newcomer's session ends and the
//      sign-in is refused; enabled, it works again;
//   6. signed out, the newcomer asks for a reset link ("Forgot your password?") and sets a
//      new password with the mailed link;
//   7. screenshots (desktop, phone, dark) and axe of the settings, invitation, account,
//      accounts, reset and forgot pages.
// Environment: KM_URL, KM_HANDSHAKE_DIR, KM_SCREENSHOT_DIR; optionally CHROMIUM.

const browser = require('./browser')

const b = browser.session({ prefix: 'team', shotsDir: process.env.KM_SCREENSHOT_DIR || '.' })
const { assert, step, fail, StepFailed } = b

const KM_URL = b.required('KM_URL').replace(/\/+$/, '')
const HANDSHAKE_DIR = b.required('KM_HANDSHAKE_DIR')
b.required('KM_SCREENSHOT_DIR')
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'

const NAV_TIMEOUT_MS = 15000
const MAIL_TIMEOUT_MS = 30000
const DESKTOP = { width: 1280, height: 800 }
const PHONE = { width: 390, height: 844 }
const PASSWORD = 'correct horse battery'

let owner = null // the owner's page
let newcomer = null // the invited person's page (another browser context)

// Screenshots and axe of `page` (the owner's unless given).
async function shots (name, page = owner) {
  const before = b.page
  b.page = page
  try {
    return await b.shots(name, { desktop: DESKTOP, phone: PHONE })
  } finally {
    b.page = before
  }
}

let requests = 0
// The link of the latest mail to `to` whose subject has `subject` (read by the test).
async function mailedLink (to, subject) {
  const n = ++requests
  b.handOver(HANDSHAKE_DIR, `request-${n}.json`, JSON.stringify({ do: 'mail', to, subject }))
  const reply = JSON.parse(await b.waitFile(HANDSHAKE_DIR, `reply-${n}.json`, MAIL_TIMEOUT_MS))
  assert(!reply.error, `no mail to ${to} about "${subject}": ${reply.error}`)
  return reply
}

const flash = async (page) => ((await page.textContent('.flash')) || '').trim()

// Submits the form holding `button` (a selector) and waits for the page it leads to.
async function submit (page, button) {
  await Promise.all([page.waitForNavigation(), page.click(button)])
}

// The settings' members as [username, role]: the role chosen in a member's select, or
// the cell's text (the owner's, or for someone who cannot change roles).
const memberRoles = (page) => page.$$eval('section.card:has(h2:text-is("Members")) tbody tr', (trs) =>
  trs.map((tr) => {
    const cells = tr.querySelectorAll('td')
    const select = cells[2].querySelector('select')
    return [cells[0].textContent.trim(), select ? select.value : cells[2].textContent.trim()]
  }))

async function api (path, token, init = {}) {
  const res = await fetch(`${KM_URL}${path}`, {
    ...init, headers: { ...(init.headers || {}), ...(token ? { authorization: `Bearer ${token}` } : {}) }
  })
  return { status: res.status, body: await res.json().catch(() => null) }
}

async function main () {
  const launched = await b.launch({ viewport: DESKTOP, timeoutMs: NAV_TIMEOUT_MS, chromiumPath: CHROMIUM })
  owner = launched.page
  owner.on('dialog', (d) => d.accept())

  const ownerName = `owner${Date.now().toString(36)}`
  const newName = `newcomer${Date.now().toString(36)}`
  const newEmail = `${newName}@example.com`
  let bucketUrl = null
  await step('the owner signs up and creates a bucket', async () => {
    await owner.goto(`${KM_URL}/signup`)
    await owner.fill('input[name=username]', ownerName)
    await owner.fill('input[name=email]', `${ownerName}@example.com`)
    await owner.fill('input[name=password]', PASSWORD)
    await submit(owner, 'button:has-text("Sign up")')
    await owner.fill('input[name=name]', 'Team e2e')
    await submit(owner, 'button:has-text("Create")')
    bucketUrl = owner.url()
    assert(/\/buckets\/[0-9a-f]{24}$/.test(bucketUrl), `not on a bucket's page: ${bucketUrl}`)
    return bucketUrl
  })

  // 2. An invitation, accepted from the mail.
  await step('invite an address without an account', async () => {
    await owner.goto(`${bucketUrl}/settings`)
    await owner.fill('input[name=email][aria-label="Email or username"]', newEmail)
    await owner.selectOption('select[name=role][aria-label=Role]', 'developer')
    await submit(owner, 'button:has-text("Add or invite")')
    const said = await flash(owner)
    assert(said.includes(`invitation mailed to ${newEmail}`), `the flash says ${JSON.stringify(said)}`)
    const pending = (await owner.textContent('#invitations')) || ''
    assert(pending.includes(newEmail) && pending.includes('developer'), `pending invitations: ${JSON.stringify(pending)}`)
    return `${said}; ${await shots('settings-invited')}`
  })
  await step('the newcomer accepts from the mail, creating their account', async () => {
    const mail = await mailedLink(newEmail, 'invites you to Team e2e')
    const context = await b.browser.newContext({ viewport: DESKTOP })
    newcomer = b.track(await context.newPage())
    newcomer.on('dialog', (d) => d.accept())
    await newcomer.goto(mail.link)
    const text = await newcomer.innerText('main')
    assert(text.includes('Join Team e2e') && text.includes(newEmail), `the invitation page shows ${JSON.stringify(text.slice(0, 300))}`)
    const shot = await shots('invitation', newcomer)
    await newcomer.fill('input[name=username]', newName)
    await newcomer.fill('input[name=password]', PASSWORD)
    await submit(newcomer, 'button:has-text("Create the account and join")')
    assert(newcomer.url() === bucketUrl, `after joining the newcomer is on ${newcomer.url()}, not ${bucketUrl}`)
    await newcomer.goto(mail.link)
    assert((await newcomer.innerText('main')).includes('does not work'), 'the invitation link still works after use')
    return `"${mail.subject}"; ${shot}`
  })
  await step('the owner sees the newcomer as a developer, nothing pending', async () => {
    await owner.goto(`${bucketUrl}/settings`)
    const members = await memberRoles(owner)
    assert(members.length === 2 && members[1][0] === newName && members[1][1] === 'developer',
      `members (user, role): ${JSON.stringify(members)}`)
    assert(!(await owner.$('#invitations')), 'an invitation is still pending')
    return JSON.stringify(members)
  })

  // 3. Ownership transfer.
  await step('transfer the ownership to the newcomer', async () => {
    await owner.selectOption('select[name=email][aria-label="New owner"]', newEmail)
    await submit(owner, '#transfer button:has-text("Transfer")')
    const said = await flash(owner)
    assert(said.includes(`${newName} owns the bucket now (told by mail)`), `the flash says ${JSON.stringify(said)}`)
    const rows = await memberRoles(owner)
    assert(rows.length === 2 && rows[0][0] === newName && rows[0][1] === 'owner' &&
      rows[1][0] === ownerName && rows[1][1] === 'admin', `members (user, role), the new owner first: ${JSON.stringify(rows)}`)
    assert(!(await owner.$('#transfer')), 'the former owner still sees the transfer card')
    const mail = await mailedLink(newEmail, 'You own Team e2e now')
    assert(mail.link.endsWith('/settings'), `the mail links to ${mail.link}`)
    return `${said}; members ${JSON.stringify(rows)}`
  })

  // 4. A personal token.
  await step('a personal token: shown once, a bearer and a refresh token, revoked', async () => {
    await owner.goto(`${KM_URL}/account`)
    await owner.fill('input[name=name]', 'ci deploys')
    await owner.selectOption('select[name=days]', '30')
    await submit(owner, 'button:has-text("Create a token")')
    const token = ((await owner.textContent('#new-token')) || '').trim()
    assert(/^[0-9a-f]{64}$/.test(token), `the new token shows as ${JSON.stringify(token)}`)
    const listed = await owner.innerText('#tokens table')
    assert(listed.includes('ci deploys'), `tokens listed: ${JSON.stringify(listed)}`)
    const shot = await shots('account-token')
    const buckets = await api('/api/bucket', token)
    assert(buckets.status === 200 && buckets.body.some((x) => x.name === 'Team e2e'), `GET /api/bucket with the token: ${buckets.status} ${JSON.stringify(buckets.body)}`)
    const refreshed = await api('/api/oauth/token', null, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ grant_type: 'refresh_token', refresh_token: token, client_id: 'js-api' })
    })
    assert(refreshed.status === 200 && refreshed.body.access_token, `the token as a refresh token: ${refreshed.status} ${JSON.stringify(refreshed.body)}`)
    const access = refreshed.body.access_token
    assert((await api('/api/users/isLogged', access)).body.username === ownerName, 'the refreshed access token is not the owner\'s')
    await owner.goto(`${KM_URL}/account`)
    assert(!(await owner.$('#new-token')), 'the token is shown again after a reload')
    await submit(owner, '#tokens button:has-text("Revoke")')
    assert((await flash(owner)).includes('revoked'), `the flash says ${JSON.stringify(await flash(owner))}`)
    const refused = await api('/api/bucket', token)
    assert(refused.status === 401, `the revoked token still reads the API: ${refused.status}`)
    const refusedAccess = await api('/api/bucket', access)
    assert(refusedAccess.status === 401, `the access token of the revoked token still works: ${refusedAccess.status}`)
    return `bearer 200, refresh 200, revoked 401/401; ${shot}`
  })

  // 5. The accounts page.
  await step('the admin mails the newcomer a password reset; its link sets a new password', async () => {
    await owner.goto(`${KM_URL}/admin/accounts`)
    const listed = await owner.innerText('#accounts')
    assert(listed.includes(ownerName) && listed.includes(newName), `accounts: ${JSON.stringify(listed)}`)
    const shot = await shots('accounts')
    await submit(owner, `button[aria-label="Reset password of ${newName}"]`)
    const said = await flash(owner)
    assert(said.includes(`a password reset link was mailed to ${newEmail}`), `the flash says ${JSON.stringify(said)}`)
    const mail = await mailedLink(newEmail, 'Set a new password')
    await newcomer.goto(mail.link)
    const resetShot = await shots('reset', newcomer)
    await newcomer.fill('input[name=new]', 'a brand new secret')
    await newcomer.fill('input[name=confirm]', 'a brand new secret')
    await submit(newcomer, 'button:has-text("Set the password")')
    assert(new URL(newcomer.url()).pathname === '/buckets', `after the reset the newcomer is on ${newcomer.url()}`)
    await newcomer.goto(mail.link)
    assert((await newcomer.innerText('main')).includes('does not work'), 'the reset link works twice')
    return `${said}; ${shot}; ${resetShot}`
  })
  await step('disabled, the newcomer is signed out and refused; enabled, they sign in', async () => {
    await submit(owner, `button[aria-label="Disable ${newName}"]`)
    assert((await flash(owner)).includes(`${newName} disabled`), `the flash says ${JSON.stringify(await flash(owner))}`)
    await newcomer.goto(`${KM_URL}/buckets`)
    assert(new URL(newcomer.url()).pathname === '/login', `a disabled account still sees ${newcomer.url()}`)
    await newcomer.fill('input[name=login]', newName)
    await newcomer.fill('input[name=password]', 'a brand new secret')
    await submit(newcomer, 'button:has-text("Sign in")')
    const refused = await flash(newcomer)
    assert(refused.includes('disabled'), `signing in to a disabled account says ${JSON.stringify(refused)}`)
    await submit(owner, `button[aria-label="Enable ${newName}"]`)
    await newcomer.fill('input[name=password]', 'a brand new secret')
    await submit(newcomer, 'button:has-text("Sign in")')
    assert(new URL(newcomer.url()).pathname === '/buckets', `enabled again, the sign-in leads to ${newcomer.url()}`)
    return `refused: "${refused}"`
  })

  await step('the newcomer, signed out, asks for a reset link and sets a new password', async () => {
    await submit(newcomer, 'header button:has-text("Sign out")')
    await submit(newcomer, 'a:has-text("Forgot your password?")')
    const shot = await shots('forgot', newcomer)
    await newcomer.fill('input[name=login]', newEmail)
    await submit(newcomer, 'button:has-text("Mail me a link")')
    const said = await flash(newcomer)
    assert(said.startsWith('If an account has this name or address'), `the flash says ${JSON.stringify(said)}`)
    const mail = await mailedLink(newEmail, 'Set a new password')
    await newcomer.goto(mail.link)
    await newcomer.fill('input[name=new]', 'the third secret')
    await newcomer.fill('input[name=confirm]', 'the third secret')
    await submit(newcomer, 'button:has-text("Set the password")')
    assert(new URL(newcomer.url()).pathname === '/buckets', `after the reset the newcomer is on ${newcomer.url()}`)
    return shot
  })

  if (b.pageErrors.length) {
    await fail('no uncaught error in the pages', new StepFailed(`${b.pageErrors.length} uncaught error(s)`))
  }
  await b.finish()
}

main().catch((e) => fail('unexpected error', e))
