// The terminal's last line belongs to the progress bar: everything else printed to stderr (log lines, a child
// process's log) goes through writeLine, which clears the bar, prints the text and redraws the bar below it, so
// the bar is never broken by a line written through it. The bar line is cut to the terminal width (a wrapped
// bar could not be cleared with one carriage return).

export interface TermStream { write(s: string): unknown; isTTY?: boolean; columns?: number }

const CLEAR = '\r\x1b[2K';

/** Display width: East Asian wide characters take two cells (enough for the bar, which may carry CJK text). */
export function displayWidth(s: string): number {
  let w = 0;
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    w += c >= 0x1100 && (c <= 0x115f || (c >= 0x2e80 && c <= 0xa4cf) || (c >= 0xac00 && c <= 0xd7a3) || (c >= 0xf900 && c <= 0xfaff) || (c >= 0xfe30 && c <= 0xfe4f) || (c >= 0xff00 && c <= 0xff60) || (c >= 0xffe0 && c <= 0xffe6) || (c >= 0x20000 && c <= 0x3fffd)) ? 2 : 1;
  }
  return w;
}

export function fitWidth(s: string, width: number): string {
  if (displayWidth(s) <= width) return s;
  let out = '', w = 0;
  for (const ch of s) {
    const cw = displayWidth(ch);
    if (w + cw > width - 1) break;
    out += ch; w += cw;
  }
  return out + '…';
}

export class Terminal {
  private status: string | null = null;
  constructor(readonly stream: TermStream) {}

  get isTTY(): boolean { return this.stream.isTTY === true; }

  /** Prints `text` (one or more lines) above the bar. */
  writeLine(text: string): void {
    const bar = this.status !== null ? this.render(this.status) : '';
    this.stream.write((this.status !== null ? CLEAR : '') + text + (text.endsWith('\n') ? '' : '\n') + bar);
  }

  /**
   * Runs `write` (output to another stream of the same terminal, e.g. stdout) with the bar cleared, then redraws
   * the bar: a line printed to stdout while the bar is up would otherwise run into it.
   */
  around(write: () => void): void {
    if (this.status === null) { write(); return; }
    this.stream.write(CLEAR);
    write();
    this.stream.write(this.render(this.status));
  }

  /** Shows (or replaces) the bar line; null removes it. */
  setStatus(line: string | null): void {
    if (line === null) {
      if (this.status !== null) this.stream.write(CLEAR);
      this.status = null;
      return;
    }
    this.status = line;
    this.stream.write(CLEAR + this.render(line));
  }

  private render(line: string): string { return fitWidth(line, Math.max(20, (this.stream.columns || 100) - 1)); }
}

/** The process's stderr. */
export const stderrTerminal = new Terminal(process.stderr);

/** `print` (stdout lines) made safe while a bar is up on stderr: the bar is cleared first and redrawn after. */
export function printAboveBar(print: (s: string) => void = (s) => { process.stdout.write(s + '\n'); }): (s: string) => void {
  return (s) => stderrTerminal.around(() => print(s));
}
