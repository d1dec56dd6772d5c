// Behavioural model of the ECP5 DP16KD block RAM, for the subset hw/memory.py uses:
// both ports on rising clocks, chip selects decoded as 0b000, no reset, data widths
// 1, 2, 4, 9 and 18. Written from the ECP5 memory usage guide (Lattice TN1264):
//
// * The array holds 18 Kbit; a port of width w addresses words of w bits, its word
//   address in the top address pins (x1: AD13..0, x2: AD13..1, x4: AD13..2,
//   x9: AD13..3, x18: AD13..4). In x18 mode AD1 and AD0 are the byte enables of a
//   write (AD0 the low nine bits).
// * CE enables the port's input registers (address, data, write enable): at a clock
//   edge with CE and WE high the word is written, with CE high and WE low it is read
//   into the output latch (WRITEMODE NORMAL: a write leaves the latch as it was).
// * REGMODE "OUTREG" adds the output register, loaded from the latch at a clock
//   edge with OCE high; "NOREG" drives the outputs from the latch.
module DP16KD #(
    parameter integer DATA_WIDTH_A = 18, parameter integer DATA_WIDTH_B = 18,
    parameter REGMODE_A = "NOREG", parameter REGMODE_B = "NOREG",
    parameter RESETMODE = "SYNC", parameter ASYNC_RESET_RELEASE = "SYNC",
    parameter CSDECODE_A = "0b000", parameter CSDECODE_B = "0b000",
    parameter WRITEMODE_A = "NORMAL", parameter WRITEMODE_B = "NORMAL",
    parameter GSR = "ENABLED"
) (
    input DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5,
          DIA4, DIA3, DIA2, DIA1, DIA0,
    input ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0,
    input CEA, OCEA, CLKA, WEA, RSTA, CSA2, CSA1, CSA0,
    output DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6,
           DOA5, DOA4, DOA3, DOA2, DOA1, DOA0,
    input DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7, DIB6, DIB5,
          DIB4, DIB3, DIB2, DIB1, DIB0,
    input ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0,
    input CEB, OCEB, CLKB, WEB, RSTB, CSB2, CSB1, CSB0,
    output DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6,
           DOB5, DOB4, DOB3, DOB2, DOB1, DOB0
);
    reg cells [0:18431];
    wire [17:0] dia = {DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8,
                       DIA7, DIA6, DIA5, DIA4, DIA3, DIA2, DIA1, DIA0};
    wire [17:0] dib = {DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8,
                       DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0};
    wire [13:0] ada = {ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3,
                       ADA2, ADA1, ADA0};
    wire [13:0] adb = {ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3,
                       ADB2, ADB1, ADB0};
    reg [17:0] latch_a = 0, latch_b = 0, out_a = 0, out_b = 0;

    function integer shift_of(input integer width);
        shift_of = width == 18 ? 4 : width == 9 ? 3 : width == 4 ? 2 : width == 2 ? 1 : 0;
    endfunction

    task automatic access(input integer width, input [13:0] ad, input [17:0] di, input we,
                          inout [17:0] latch);
        integer word, i;
        begin
            word = ad >> shift_of(width);
            for (i = 0; i < width; i = i + 1)
                if (we) begin
                    if (width != 18 || (i < 9 ? ad[0] : ad[1]))
                        cells[word * width + i] = di[i];
                end else
                    latch[i] = cells[word * width + i];
        end
    endtask

    integer k;
    initial for (k = 0; k < 18432; k = k + 1) cells[k] = 1'b0;

    // The output register takes the latch as it was before this edge.
    always @(posedge CLKA) begin
        if (OCEA) out_a <= latch_a;
        if (CEA) access(DATA_WIDTH_A, ada, dia, WEA, latch_a);
    end
    always @(posedge CLKB) begin
        if (OCEB) out_b <= latch_b;
        if (CEB) access(DATA_WIDTH_B, adb, dib, WEB, latch_b);
    end
    wire [17:0] doa = REGMODE_A == "OUTREG" ? out_a : latch_a;
    wire [17:0] dob = REGMODE_B == "OUTREG" ? out_b : latch_b;
    assign {DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6,
            DOA5, DOA4, DOA3, DOA2, DOA1, DOA0} = doa;
    assign {DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6,
            DOB5, DOB4, DOB3, DOB2, DOB1, DOB0} = dob;
endmodule
